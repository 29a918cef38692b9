//! Salesforce Outbound Messages: SOAP notifications of changed records.
//!
//! Outbound Messages carry no signature. What identifies the sender is the `OrganizationId`,
//! which the receiver must match to an integration before it trusts the delivery; each
//! `Notification/Id` is unique and repeated on redelivery, so it deduplicates. The answer is a
//! SOAP `<Ack>true</Ack>`; anything else makes Salesforce retry for up to 24 hours.
//!
//! A message carries whichever fields its rule selected, as they were when it was sent: only
//! the record ids are taken from it, and the records are read from the API. A message's up to
//! 100 notifications of one object become one notification of all their records, so that a
//! bulk update costs a query per 200 records rather than one per record; it is named after all
//! the notifications it carries, so that a redelivery of the same message is still a
//! duplicate.

use quick_xml::Reader;
use quick_xml::events::Event;

use crate::{WebhookAnswer, WebhookError, WebhookNotification, WebhookRequest};

/// The acknowledgement Salesforce expects for a delivery.
pub const ACK: &str = concat!(
    r#"<?xml version="1.0" encoding="UTF-8"?>"#,
    r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">"#,
    r#"<soapenv:Body><notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound">"#,
    r#"<Ack>true</Ack></notificationsResponse></soapenv:Body></soapenv:Envelope>"#
);

/// The most notifications Salesforce puts in one message.
const MAX_NOTIFICATIONS: usize = 100;

fn malformed(message: impl Into<String>) -> WebhookError {
    WebhookError::Malformed(message.into())
}

fn entity_text(name: &str) -> Option<String> {
    match name {
        "lt" => Some("<".into()),
        "gt" => Some(">".into()),
        "amp" => Some("&".into()),
        "apos" => Some("'".into()),
        "quot" => Some("\"".into()),
        _ => {
            let code = name.strip_prefix('#')?;
            let n = match code.strip_prefix('x') {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => code.parse().ok()?,
            };
            char::from_u32(n).map(String::from)
        }
    }
}

/// An Outbound Message delivery as read: the org it names and its notifications.
#[derive(Debug)]
pub struct OutboundMessage {
    /// In its 18-character form.
    pub organization_id: String,
    pub notifications: Vec<WebhookNotification>,
}

/// The answer Salesforce expects, or it delivers the message again.
pub fn ack() -> WebhookAnswer {
    WebhookAnswer::new(200, "text/xml; charset=utf-8", ACK)
}

/// Parses an Outbound Message delivery.
pub fn parse(request: &WebhookRequest<'_>) -> Result<OutboundMessage, WebhookError> {
    let content_type = request
        .headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .and_then(|(_, v)| v.first())
        .map(|v| v.to_ascii_lowercase())
        .unwrap_or_default();
    if !content_type.contains("xml") {
        return Err(malformed(format!(
            "an Outbound Message is SOAP XML; the Content-Type is `{content_type}`"
        )));
    }
    let body = request
        .body
        .filter(|b| !b.trim().is_empty())
        .ok_or_else(|| malformed("the delivery has no body"))?;

    let mut reader = Reader::from_str(body);
    let mut parser = Parser::default();
    loop {
        let event = reader
            .read_event()
            .map_err(|e| malformed(format!("the SOAP body is not well-formed XML: {e}")))?;
        match event {
            Event::Start(ref start) | Event::Empty(ref start) => {
                let name = start.local_name().as_ref().to_string();
                let attribute = |wanted: &str| {
                    start
                        .attributes()
                        .flatten()
                        .find(|a| a.key.local_name().as_ref() == wanted)
                        .map(|a| a.value.to_string())
                };
                parser.open(name, attribute("type"));
                if matches!(event, Event::Empty(_)) {
                    parser.close()?;
                }
            }
            Event::Text(t) => parser.text.push_str(&t.xml10_content()),
            Event::CData(c) => parser.text.push_str(&c.xml10_content()),
            Event::GeneralRef(r) => {
                let name = r.xml10_content();
                let text = entity_text(&name)
                    .ok_or_else(|| malformed(format!("unknown entity &{name};")))?;
                parser.text.push_str(&text);
            }
            Event::End(_) => parser.close()?,
            Event::Eof => break,
            _ => {}
        }
    }
    // Integrations keep the 18-character form; a message may carry either.
    let organization_id = parser
        .organization_id
        .ok_or_else(|| malformed("the notification has no OrganizationId"))
        .and_then(|id| {
            super::normalize_id(&id)
                .ok_or_else(|| malformed("the OrganizationId is not a Salesforce id"))
        })?;
    if parser.notifications.is_empty() {
        return Err(malformed("the delivery has no Notification"));
    }
    if parser.notifications.len() > MAX_NOTIFICATIONS {
        return Err(malformed(format!(
            "the delivery has {} notifications; Salesforce sends at most {MAX_NOTIFICATIONS}",
            parser.notifications.len()
        )));
    }
    Ok(OutboundMessage {
        organization_id,
        notifications: by_object(parser.notifications),
    })
}

/// The notifications of each object as one, named by all of theirs: a single notification
/// keeps its own id.
fn by_object(notifications: Vec<WebhookNotification>) -> Vec<WebhookNotification> {
    use sha2::{Digest, Sha256};
    let mut objects: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let mut others = Vec::new();
    for notification in notifications {
        match notification {
            WebhookNotification::Records {
                id,
                entity,
                record_ids,
            } => match objects.iter_mut().find(|(e, _, _)| *e == entity) {
                Some((_, ids, records)) => {
                    ids.push(id);
                    for record in record_ids {
                        if !records.contains(&record) {
                            records.push(record);
                        }
                    }
                }
                None => objects.push((entity, vec![id], record_ids)),
            },
            other => others.push(other),
        }
    }
    let merged = objects.into_iter().map(|(entity, mut ids, record_ids)| {
        let id = if ids.len() == 1 {
            ids.remove(0)
        } else {
            ids.sort();
            let digest = Sha256::digest(ids.join(",").as_bytes());
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("{}+{}-{hex}", ids[0], ids.len() - 1)
        };
        WebhookNotification::Records {
            id,
            entity,
            record_ids,
        }
    });
    merged.chain(others).collect()
}

/// What the parser has seen so far of a delivery.
#[derive(Default)]
struct Parser {
    /// Local names of the open elements.
    path: Vec<String>,
    /// Text of the innermost element.
    text: String,
    organization_id: Option<String>,
    notification_id: Option<String>,
    entity: Option<String>,
    record_id: Option<String>,
    notifications: Vec<WebhookNotification>,
}

impl Parser {
    fn open(&mut self, name: String, xsi_type: Option<String>) {
        if name == "sObject" {
            self.entity = xsi_type.map(|t| t.rsplit(':').next().unwrap_or_default().to_string());
            self.record_id = None;
        }
        self.text.clear();
        self.path.push(name);
    }

    /// Handles the end of the innermost element.
    fn close(&mut self) -> Result<(), WebhookError> {
        let name = self.path.pop().unwrap_or_default();
        let parent = self.path.last().map(String::as_str).unwrap_or_default();
        let value = std::mem::take(&mut self.text).trim().to_string();
        match (parent, name.as_str()) {
            ("notifications", "OrganizationId") => self.organization_id = Some(value),
            ("Notification", "Id") => self.notification_id = Some(value),
            ("sObject", "Id") => self.record_id = Some(value),
            (_, "Notification") => {
                let id = self
                    .notification_id
                    .take()
                    .ok_or_else(|| malformed("a Notification has no Id"))?;
                let entity = self
                    .entity
                    .clone()
                    .ok_or_else(|| malformed(format!("notification {id} has no sObject type")))?;
                let record_id = self
                    .record_id
                    .take()
                    .ok_or_else(|| malformed(format!("notification {id}'s sObject has no Id")))?;
                self.notifications.push(WebhookNotification::Records {
                    id,
                    entity,
                    record_ids: vec![record_id],
                });
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const DELIVERY: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <soapenv:Body>
  <notifications xmlns="http://soap.sforce.com/2005/09/outbound">
   <OrganizationId>00D000000000062EAA</OrganizationId>
   <ActionId>04k000000000001AAA</ActionId>
   <SessionId xsi:nil="true"/>
   <EnterpriseUrl>https://acme.my.salesforce.com/services/Soap/c/62.0/00D000000000062</EnterpriseUrl>
   <PartnerUrl>https://acme.my.salesforce.com/services/Soap/u/62.0/00D000000000062</PartnerUrl>
   <Notification>
    <Id>04l000000000001AAA</Id>
    <sObject xsi:type="sf:Account" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
     <sf:Id>001000000000001AAA</sf:Id>
     <sf:Name>Smith &amp; Sons</sf:Name>
     <sf:Industry xsi:nil="true"/>
     <sf:SystemModstamp>2026-11-22T10:00:00.000Z</sf:SystemModstamp>
    </sObject>
   </Notification>
   <Notification>
    <Id>04l000000000002AAA</Id>
    <sObject xsi:type="sf:Account" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
     <sf:Id>001000000000002AAA</sf:Id>
     <sf:Name><![CDATA[Globex <EU>]]></sf:Name>
    </sObject>
   </Notification>
  </notifications>
 </soapenv:Body>
</soapenv:Envelope>"#;

    fn request<'a>(
        headers: &'a [(String, Vec<String>)],
        body: Option<&'a str>,
    ) -> WebhookRequest<'a> {
        static NO_QUERY: std::collections::BTreeMap<String, String> =
            std::collections::BTreeMap::new();
        WebhookRequest {
            url: "https://func-sync.example/api/webhooks/salesforce",
            headers,
            query: &NO_QUERY,
            body,
        }
    }

    fn headers() -> Vec<(String, Vec<String>)> {
        vec![(
            "Content-Type".into(),
            vec!["text/xml; charset=utf-8".into()],
        )]
    }

    #[test]
    fn a_delivery_is_read_with_its_organization_and_records() {
        let headers = headers();
        let delivery = parse(&request(&headers, Some(DELIVERY))).unwrap();
        assert_eq!(delivery.organization_id, "00D000000000062EAA");
        // One read of both records, named after both notifications.
        let [
            WebhookNotification::Records {
                id,
                entity,
                record_ids,
            },
        ] = &delivery.notifications[..]
        else {
            panic!("{:?}", delivery.notifications);
        };
        assert_eq!(entity, "Account");
        assert_eq!(record_ids, &["001000000000001AAA", "001000000000002AAA"]);
        assert!(id.starts_with("04l000000000001AAA+1-"), "{id}");
        let again = parse(&request(&headers, Some(DELIVERY))).unwrap();
        assert_eq!(
            again.notifications, delivery.notifications,
            "a redelivery reads the same"
        );
        let one = DELIVERY.replace("04l000000000002AAA", "04l000000000003AAA");
        let other = parse(&request(&headers, Some(&one))).unwrap();
        assert_ne!(
            other.notifications[0].id(),
            id,
            "other notifications, another name"
        );
        assert!(ack().body.contains("<Ack>true</Ack>"));
    }

    #[test]
    fn a_15_character_organization_id_is_read_in_its_18_character_form() {
        let headers = headers();
        let body = DELIVERY.replace("00D000000000062EAA</", "00D000000000062</");
        let delivery = parse(&request(&headers, Some(&body))).unwrap();
        assert_eq!(delivery.organization_id, "00D000000000062EAA");
    }

    #[test]
    fn a_delivery_of_more_notifications_than_salesforce_sends_is_refused() {
        let headers = headers();
        let one = DELIVERY
            .split("<Notification>")
            .nth(1)
            .and_then(|n| n.split("</Notification>").next())
            .unwrap();
        let many: String = (0..101)
            .map(|i| {
                format!(
                    "<Notification>{}</Notification>",
                    one.replace("04l000000000001AAA", &format!("04l{i:015}"))
                )
            })
            .collect();
        let start = DELIVERY.find("<Notification>").unwrap();
        let end = DELIVERY.rfind("</Notification>").unwrap() + "</Notification>".len();
        let body = format!("{}{many}{}", &DELIVERY[..start], &DELIVERY[end..]);
        match parse(&request(&headers, Some(&body))) {
            Err(WebhookError::Malformed(reason)) => assert!(reason.contains("101"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unverifiable_deliveries_are_refused_with_a_reason() {
        let headers = headers();
        for (body, reason) in [
            ("<a><b></a>", "not well-formed"),
            (
                r#"<notifications><Notification><Id>1</Id><sObject type="sf:Account"><Id>001</Id></sObject></Notification></notifications>"#,
                "no OrganizationId",
            ),
            (
                "<notifications><OrganizationId>00D000000000062EAA</OrganizationId></notifications>",
                "no Notification",
            ),
            (
                "<notifications><OrganizationId>00D</OrganizationId></notifications>",
                "not a Salesforce id",
            ),
        ] {
            let err = parse(&request(&headers, Some(body))).unwrap_err();
            assert!(err.to_string().contains(reason), "{body}: {err}");
        }
        let json = vec![("Content-Type".into(), vec!["application/json".into()])];
        let err = parse(&request(&json, Some("{}"))).unwrap_err();
        assert!(err.to_string().contains("SOAP XML"), "{err}");
        let err = parse(&request(&headers, None)).unwrap_err();
        assert!(err.to_string().contains("no body"), "{err}");
    }
}
